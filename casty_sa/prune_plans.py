"""What pruning deletes of one entity: its *plan*, and the projections that hold events back.

A plan says up to which sequence number an entity's events go, and how many stored rows
that is (:func:`plan_entity`, two statements):

- the latest snapshot's sequence number (events it covers; an entity with none keeps
  everything), and with ``before``, only the first events older than that time (a
  prefix: the first event at or after it stops the plan, so what goes is one range
  ``1…n``). ``force`` drops the snapshot's bound (``before`` alone);
- never an event a registered projection has not handled yet (:class:`Holds`): each
  row of ``casty_sa_projection_offsets`` whose slice holds the entity
  (``zlib.crc32(entity_id) % slice_count``) keeps the entity's events after its
  offset, and a slice that has handled nothing keeps all of them. A projection's
  ``entity_prefix`` and ``event_types`` are the application's code, not stored, so
  every projection counts as reading every event: one that filters holds events back
  until it handles a later one (``ignore`` leaves a projection out).

Examples
--------
>>> holds = Holds([Hold("balances", 0, 2, None), Hold("balances", 1, 2, "0" * 36)])
>>> [(hold.slice, hold.offset) for hold in holds.of("acct-1")]
[(1, '000000000000000000000000000000000000')]
>>> holds.of("acct-4")[0].place is None  # slice 0 has handled nothing: it keeps every event
True
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import case, func, literal_column, select, tuple_
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from casty_sa.diagnosis import database_error
from casty_sa.engine import bind_schema, open_engine
from casty_sa.models import journal_tables
from casty_sa.ordering import global_order, parse_offset
from casty_sa.projections.offsets import OffsetTable
from casty_sa.projections.worker import slice_of
from casty_sa.urls import UrlLike, engine_secrets

__all__ = [
    "Hold",
    "Holds",
    "Plan",
    "Rule",
    "nth_stored",
    "plan_entity",
    "projection_holds",
    "snapshots_of",
]

Place = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class Rule:
    """Which of an entity's events go: those its latest snapshot covers; with ``before``
    (seconds since 1970) only those older; ``force``: ``before`` alone, snapshot or not."""

    before: float | None = None
    force: bool = False

    def __post_init__(self) -> None:
        if self.force and self.before is None:
            raise ValueError("force needs before: without it the snapshot is the only bound")
        if self.before is not None and not math.isfinite(self.before):
            raise ValueError(f"before must be a finite time, not {self.before!r}")


@dataclass(frozen=True, slots=True)
class Hold:
    """One projection's slice as pruning reads it: the offset of the last event it handled
    (``None``: none yet)."""

    projection: str
    slice: int
    slice_count: int
    offset: str | None

    @property
    def place(self) -> Place | None:
        """The offset's place in the global order."""
        return None if self.offset is None else parse_offset(self.offset)


class Holds:
    """The projections' slices, looked up by entity: which slice of each holds it."""

    def __init__(self, rows: Iterable[Hold]) -> None:
        self._slices: dict[str, dict[int, Hold]] = defaultdict(dict)
        self._counts: dict[str, int] = {}
        for row in rows:
            self._slices[row.projection][row.slice] = row
            # rows of one projection share a count (a reset remakes them all at once)
            self._counts[row.projection] = row.slice_count

    def of(self, entity_id: str) -> list[Hold]:
        """For each projection, the slice that reads ``entity_id``'s events (a slice whose
        row is missing counts as one that has handled nothing)."""
        found = []
        for name, count in sorted(self._counts.items()):
            index = slice_of(entity_id, count)
            found.append(self._slices[name].get(index, Hold(name, index, count, None)))
        return found

    def __bool__(self) -> bool:
        return bool(self._counts)


@dataclass(frozen=True, slots=True)
class Plan:
    """What goes of one entity: its stored events with ``sequence_nr <= upto`` (``count``
    rows); ``held`` maps each projection that keeps some of the events the rule would
    delete to how many (and the slice that does)."""

    entity_id: str
    upto: int
    count: int
    snapshot: int | None
    held: dict[str, tuple[int, Hold]] = field(default_factory=dict)


async def projection_holds(
    target: UrlLike | AsyncEngine,
    *,
    schema: str | None = None,
    ignore: Collection[str] = (),
    connect_timeout: float | None = None,
) -> Holds:
    """The slices of every projection in ``target``'s offsets table (the read model's
    database), but those named in ``ignore``."""
    engine, owned = open_engine(target, connect_timeout=connect_timeout)
    try:
        async with AsyncSession(bind_schema(engine, schema)) as session, session.begin():
            rows = await OffsetTable().rows(session)
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        raise database_error(
            exc,
            engine.url,
            "read the projections' offsets",
            secrets=engine_secrets(engine.url, target),
            schema=schema,
        ) from exc
    finally:
        if owned:
            await engine.dispose()
    return Holds(
        Hold(row.projection, row.slice, row.slice_count, row.last_offset)
        for row in rows
        if row.projection not in ignore
    )


async def plan_entity(
    connection: AsyncConnection,
    entity_id: str,
    snapshot: int | None,
    rule: Rule,
    holds: Holds,
) -> Plan:
    """What ``rule`` deletes of ``entity_id`` whose latest snapshot is at ``snapshot``,
    and which projections of ``holds`` keep part of it, read on ``connection``.

    One statement finds the bounds (the first event at or after ``rule.before``, the
    first each projection has not handled), a second counts the rows.
    """
    nothing = Plan(entity_id, 0, 0, snapshot)
    if snapshot is None and not rule.force:
        return nothing  # no snapshot covers anything
    events = journal_tables()[0]
    seq = events.c.sequence_nr
    mine = holds.of(entity_id)
    places = sorted({hold.place for hold in mine if hold.place is not None})
    columns: list[Any] = [func.min(seq), func.max(seq)]
    if rule.before is not None:
        columns.append(func.min(case((events.c.timestamp >= rule.before, seq))))
    order = tuple_(*global_order(events))
    columns += [func.min(case((order > tuple_(*place), seq))) for place in places]
    query = select(*columns).where(events.c.entity_id == entity_id)
    if not rule.force:
        query = query.where(seq <= snapshot)
    first, last, *rest = (await connection.execute(query)).one()
    if first is None:
        return nothing
    target = last
    if rule.before is not None:
        young = rest.pop(0)
        target = target if young is None else min(target, young - 1)
    if target < first:
        return nothing
    unhandled = dict(zip(places, rest, strict=True))
    limits: dict[str, tuple[int, Hold]] = {}
    for hold in mine:
        after = first if hold.place is None else unhandled[hold.place]
        if after is not None and after - 1 < target:
            limits[hold.projection] = (after - 1, hold)
    upto = min([target, *(limit for limit, _ in limits.values())])
    counts = [func.count(case((seq <= upto, literal_column("1"))))]
    counts += [func.count(case((seq > limit, literal_column("1")))) for limit, _ in limits.values()]
    query = select(*counts).where(events.c.entity_id == entity_id, seq <= target)
    found: list[int] = list((await connection.execute(query)).one())
    count, kept = found[0], found[1:]
    held = {name: (n, hold) for (name, (_, hold)), n in zip(limits.items(), kept, strict=True)}
    return Plan(entity_id, upto if count else 0, count, snapshot, held)


async def snapshots_of(connection: AsyncConnection, entity_ids: list[str]) -> dict[str, int]:
    """The sequence number of each entity's latest snapshot (those that have one)."""
    snapshots = journal_tables()[1]
    query = select(snapshots.c.entity_id, snapshots.c.sequence_nr).where(
        snapshots.c.entity_id.in_(entity_ids)
    )
    return {entity: seq for entity, seq in await connection.execute(query)}


async def nth_stored(connection: AsyncConnection, plan: Plan, n: int) -> int | None:
    """The ``n``-th lowest stored sequence number of the plan's rows (``None``: fewer left)."""
    events = journal_tables()[0]
    seq = events.c.sequence_nr
    query = (
        select(seq)
        .where(events.c.entity_id == plan.entity_id, seq <= plan.upto)
        .order_by(seq)
        .limit(1)
        .offset(n - 1)
    )
    found: int | None = (await connection.execute(query)).scalar()
    return found
