"""Pruning: what plans say of each entity deleted in bounded batches (``casty-sa prune``).

Entities are looked at one after another (one, or every entity with events, walked in
pages of ids); each gets a plan (:mod:`casty_sa.prune_plans`: its snapshot, the date,
the projections that have not handled its events yet), and its rows go into batches
of at most ``batch_size`` rows, an entity cut where a batch is full. Each batch is one
transaction of :func:`casty_sa.retention.delete_up_to`, which raises each entity's
tombstone with its delete (a sequence number is never used twice) while writers wait:
a run stopped anywhere (even by ``SIGKILL``) left whole batches only, and the same
run again plans from what is stored and finishes the job. Nothing is kept between
batches but the counts. ``dry_run`` makes the same plans and deletes nothing: its
counts are what a run would delete, the same moment.

Examples
--------
>>> report = PruneReport(dry_run=True)
>>> (report.events, report.capped, report.held)
(0, False, {})
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from casty_sa.codec import check_entity_id
from casty_sa.diagnosis import database_error
from casty_sa.engine import bind_schema, read_connection
from casty_sa.errors import DeletionRefused
from casty_sa.journal import SAJournal
from casty_sa.prune_plans import (
    Hold,
    Holds,
    Plan,
    Rule,
    nth_stored,
    plan_entity,
    projection_holds,
    snapshots_of,
)
from casty_sa.retention import Cut, delete_up_to
from casty_sa.urls import engine_secrets

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

#: Rows per delete (and per transaction) unless told otherwise: writers wait while a batch
#: holds the lock against them (500 rows: about 20 ms on SQLite and PostgreSQL, measured on a
#: busy 2-core machine).
DEFAULT_BATCH_SIZE = 500
#: Entities whose snapshots are read in one statement.
_CHUNK = 500


@dataclass(slots=True)
class HeldBack:
    """Events a projection keeps because it has not handled them yet, of how many entities,
    and the slices that keep them: ``(slice, slice_count, offset)`` (``offset`` ``None``: the
    slice has handled nothing)."""

    events: int = 0
    entities: int = 0
    slices: set[tuple[int, int, str | None]] = field(default_factory=set)


@dataclass(slots=True)
class PruneReport:
    """What a prune did (or, ``dry_run``, would do).

    ``events`` deleted (would be) of ``pruned`` entities in ``batches`` transactions
    (a refused batch, tried again one entity at a time, counts each attempt),
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
        if not await run.entities(chunk):
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

    async def entities(self, chunk: list[str]) -> bool:
        """Each entity of ``chunk`` in turn (their snapshots read at once); ``False`` once
        ``max_rows`` is reached."""
        snapshots = functools.partial(snapshots_of, entity_ids=chunk)
        covered = await self.read("read the snapshots' sequence numbers", snapshots)
        for entity_id in chunk:
            if not await self.entity(entity_id, covered.get(entity_id)):
                return False
        return True

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
                nth = functools.partial(nth_stored, plan=plan, n=size)
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

        Refused (a snapshot went away meanwhile, its events still there), nothing of it was deleted:
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
        # one connection taken in turn; on its own task (a cancel mid-statement would drop
        # the connection: a memory database's whole content)
        options = journal._retention()
        work = delete_up_to(journal.engine, cuts, force=force, **options)
        return await journal._inflight.shielded(work)

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(Progress(self.report.entities, self.report.events, self.total))


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


def _note_held(report: PruneReport, plan: Plan) -> None:
    for name, (events, hold) in plan.held.items():
        held = report.held.setdefault(name, HeldBack())
        held.events += events
        held.entities += 1
        held.slices.add((hold.slice, hold.slice_count, hold.offset))
