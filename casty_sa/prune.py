"""Pruning: the events a snapshot covers deleted in bounded batches (``casty-sa prune``).

For each entity (one, or every entity with events, walked in pages of ids) a *plan*
says up to which sequence number its events go, and how many stored rows that is:

- the latest snapshot's sequence number (events it covers; an entity with none keeps
  everything), and with ``before``, only the first events older than that time (a
  prefix: the first event at or after it stops the plan, so sequence numbers stay a
  single deleted range). ``force`` drops the snapshot's bound (``before`` alone);
- never an event a registered projection has not handled yet (:class:`Holds`): each
  row of ``casty_sa_projection_offsets`` whose slice holds the entity
  (``zlib.crc32(entity_id) % slice_count``) keeps the entity's events after its
  offset, and a slice that has handled nothing keeps all of them. A projection's
  ``entity_prefix`` and ``event_types`` are the application's code, not stored, so
  every projection counts as reading every event: one that filters holds events back
  until it handles a later one (``ignore`` leaves a projection out).

The deletes go through :meth:`SAJournal.delete_events
<casty_sa.SAJournal.delete_events>` (:mod:`casty_sa.retention`), one transaction per
batch of at most ``batch_size`` rows: each commits with the entity's tombstone, so a
run stopped anywhere (even by ``SIGKILL``) left whole batches only, and the same run
again plans from what is stored and finishes the job. ``dry_run`` makes the same
plans and deletes nothing: its counts are what a run would delete, the same moment.

Examples
--------
>>> holds = Holds([Hold("balances", 0, 2, None), Hold("balances", 1, 2, "0" * 36)])
>>> [(hold.slice, hold.offset) for hold in holds.of("acct-1")]
[(1, '000000000000000000000000000000000000')]
>>> holds.of("acct-3")[0].place is None  # slice 0 has handled nothing: it keeps every event
True
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import case, func, literal_column, select, tuple_
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from casty_sa.codec import check_entity_id
from casty_sa.diagnosis import database_error
from casty_sa.engine import bind_schema, open_engine, read_connection
from casty_sa.errors import DeletionRefused
from casty_sa.journal import SAJournal
from casty_sa.models import journal_tables
from casty_sa.ordering import global_order, parse_offset
from casty_sa.projections.offsets import OffsetTable
from casty_sa.projections.worker import slice_of
from casty_sa.retention import Cut, delete_up_to
from casty_sa.urls import UrlLike, engine_secrets

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "HeldBack",
    "Hold",
    "Holds",
    "Plan",
    "Progress",
    "PruneReport",
    "Rule",
    "plan_entity",
    "projection_holds",
    "prune",
]

#: Rows per delete (and per transaction) unless told otherwise: on PostgreSQL writers wait
#: for each batch's lock, so a batch stays a few milliseconds.
DEFAULT_BATCH_SIZE = 500
#: Entities whose snapshots are read in one statement.
_CHUNK = 500

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


@dataclass(slots=True)
class HeldBack:
    """Events a projection keeps: it has not handled them yet (``offset``: the lowest
    offset among its slices that did; ``None``: a slice that has handled nothing)."""

    events: int = 0
    entities: int = 0
    slices: set[tuple[int, int, str | None]] = field(default_factory=set)


@dataclass(slots=True)
class PruneReport:
    """What a prune did (or, ``dry_run``, would do).

    ``events`` deleted (would be) of ``pruned`` entities in ``batches`` transactions,
    of ``entities`` looked at; ``no_snapshot`` of those kept everything for want of a
    snapshot; ``refused``: deletes refused because the snapshot went away meanwhile
    (:class:`~casty_sa.errors.DeletionRefused`, nothing of those deleted); ``capped``:
    it stopped at ``max_rows``; ``held`` by projection.
    """

    dry_run: bool
    entities: int = 0
    pruned: int = 0
    events: int = 0
    batches: int = 0
    no_snapshot: int = 0
    refused: int = 0
    capped: bool = False
    held: dict[str, HeldBack] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a prune stands: entities looked at, events deleted (or counted), and the
    total expected when known (a dry run made first)."""

    entities: int
    events: int
    total: int | None = None


OnProgress = Callable[[Progress], None]


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


async def prune(
    journal: SAJournal,
    rule: Rule,
    *,
    entity_id: str | None = None,
    holds: Holds | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_rows: int | None = None,
    dry_run: bool = False,
    on_progress: OnProgress | None = None,
    total: int | None = None,
) -> PruneReport:
    """Delete what ``rule`` says of entity ``entity_id`` (``None``: of every entity with
    events), in batches of at most ``batch_size`` rows and at most ``max_rows`` in all;
    ``dry_run``: count only, delete nothing.

    Parameters
    ----------
    journal : SAJournal
        The journal whose events go (started here if it is not).
    holds : Holds | None
        The projections that keep events they have not handled (:func:`projection_holds`;
        ``None``: none).
    on_progress : callable | None
        Called with a :class:`Progress` after each batch and each entity (``total``:
        what it reports as the expected total, e.g. a dry run's count).
    """
    if entity_id is not None:
        check_entity_id(entity_id)
    if batch_size < 1 or (max_rows is not None and max_rows < 0):
        raise ValueError("batch_size must be at least 1 and max_rows at least 0")
    await journal.start()
    run = _Run(journal, rule, holds if holds is not None else Holds(()), dry_run)
    run.batch_size, run.max_rows = batch_size, max_rows
    run.on_progress, run.total = on_progress, total
    async for chunk in _entities(journal, entity_id):
        covered = await run.read("read snapshots", functools.partial(_snapshots, entity_ids=chunk))
        for entity in chunk:
            if not await run.entity(entity, covered.get(entity)):
                break
        else:
            continue
        break
    await run.flush()
    return run.report


class _Run:
    """One prune: its settings, what it did so far, and the batch being filled.

    A batch takes rows of one entity after another (a cut per entity: ``(entity_id,
    to_sequence_nr, rows)``) until it holds ``batch_size``; an entity with more is cut
    where the batch is full, and goes on in the next one.
    """

    def __init__(self, journal: SAJournal, rule: Rule, holds: Holds, dry_run: bool) -> None:
        self.journal = journal
        self.rule = rule
        self.holds = holds
        self.report = PruneReport(dry_run)
        self.batch_size = DEFAULT_BATCH_SIZE
        self.max_rows: int | None = None
        self.on_progress: OnProgress | None = None
        self.total: int | None = None
        self._reader = bind_schema(journal.engine, journal.schema)
        self._batch: list[tuple[str, int, int]] = []
        self._rows = 0  # in the batch
        self._force = False  # the batch's cuts go beyond a snapshot
        self._last_pruned: str | None = None

    async def read[T](self, what: str, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """``work`` on a connection that only reads, in a short transaction of its own; a
        failure in casty-sa's words (no password)."""
        engine = self.journal.engine
        try:
            async with read_connection(self._reader) as connection:
                return await work(connection)
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            secrets = engine_secrets(engine.url, engine.url)
            raise database_error(
                exc, engine.url, what, secrets=secrets, schema=self.journal.schema
            ) from exc

    async def entity(self, entity_id: str, snapshot: int | None) -> bool:
        """Plan ``entity_id``'s prune and put its rows in batches; ``False`` once
        ``max_rows`` is reached."""
        report = self.report
        if self.max_rows is not None and report.events + self._rows >= self.max_rows:
            report.capped = True
            return False
        report.entities += 1
        if snapshot is None and not self.rule.force:
            report.no_snapshot += 1
        else:
            plan = await self.read(
                f"plan the prune of {entity_id!r}",
                functools.partial(
                    plan_entity, entity_id=entity_id, snapshot=snapshot, rule=self.rule,
                    holds=self.holds,
                ),
            )  # fmt: skip
            _note_held(report, plan)
            if plan.count:
                await self._take(plan)
        self._progress()
        return True

    async def _take(self, plan: Plan) -> None:
        """Put the plan's rows into batches (a dry run counts them), deleting each full one."""
        report = self.report
        left = plan.count
        if self.max_rows is not None and self.max_rows - report.events - self._rows < left:
            left = self.max_rows - report.events - self._rows
            report.capped = True
        if report.dry_run:
            report.events += left
            report.pruned += 1
            return
        # the snapshot bounds the delete unless the rule says otherwise (retention checks it)
        force = self.rule.force and (plan.snapshot is None or plan.upto > plan.snapshot)
        if self._batch and force != self._force:
            await self.flush()
        taken = 0
        while left > 0:
            size = min(self.batch_size - self._rows, left)
            to = plan.upto
            if size < plan.count - taken:  # part of the entity: cut after its size-th row
                nth = functools.partial(_nth, plan=plan, n=size)
                found = await self.read(f"cut a batch of {plan.entity_id!r}", nth)
                to = plan.upto if found is None else found
            self._batch.append((plan.entity_id, to, size))
            self._rows += size
            self._force = force
            taken += size
            left -= size
            if self._rows >= self.batch_size:
                await self.flush()

    async def flush(self) -> None:
        """Delete the batch's cuts in one transaction (:func:`casty_sa.retention.delete_up_to`).

        Refused (a snapshot went away meanwhile: ``forget``), nothing of it was deleted:
        each cut goes again alone, and the refused ones are counted.
        """
        batch, force = self._batch, self._force
        self._batch, self._rows = [], 0
        if not batch:
            return
        cuts = [(entity, to) for entity, to, _ in batch]
        try:
            done = await self._delete(cuts, force)
        except DeletionRefused:
            done = []
            for single in cuts:
                try:
                    done += await self._delete([single], force)
                except DeletionRefused:
                    self.report.refused += 1
        for cut in done:
            self.report.events += cut.deleted
            if cut.deleted and cut.entity_id != self._last_pruned:
                self.report.pruned += 1
                self._last_pruned = cut.entity_id
        self._progress()

    async def _delete(self, cuts: list[tuple[str, int]], force: bool) -> list[Cut]:
        self.report.batches += 1
        journal = self.journal
        # the journal's own settings: its schema, its wording of errors, a memory database's
        # one connection taken in turn
        options = journal._retention()
        return await delete_up_to(journal.engine, cuts, force=force, **options)

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(Progress(self.report.entities, self.report.events, self.total))


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


async def _entities(journal: SAJournal, entity_id: str | None) -> AsyncIterator[list[str]]:
    """The entities to look at, a page at a time: ``entity_id``, or every one with events."""
    if entity_id is not None:
        yield [entity_id]
        return
    chunk: list[str] = []
    async for found in journal.entity_ids():
        chunk.append(found)
        if len(chunk) == _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def _snapshots(connection: AsyncConnection, entity_ids: list[str]) -> dict[str, int]:
    """The sequence number of each entity's latest snapshot (those that have one)."""
    snapshots = journal_tables()[1]
    query = select(snapshots.c.entity_id, snapshots.c.sequence_nr).where(
        snapshots.c.entity_id.in_(entity_ids)
    )
    return {entity: seq for entity, seq in await connection.execute(query)}


async def _nth(connection: AsyncConnection, plan: Plan, n: int) -> int | None:
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


def _note_held(report: PruneReport, plan: Plan) -> None:
    for name, (events, hold) in plan.held.items():
        held = report.held.setdefault(name, HeldBack())
        held.events += events
        held.entities += 1
        held.slices.add((hold.slice, hold.slice_count, hold.offset))
