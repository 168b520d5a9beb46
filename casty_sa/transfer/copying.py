"""The copy: prove one history, copy what the target lacks in batches, then verify by content.

Events go first, in key order, one target transaction per batch; snapshots follow, so a
snapshot never gets ahead of the events it summarizes. The rules a copy keeps are in
:mod:`casty_sa.transfer`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

from casty_sa.batching import DEFAULT_MAX_BATCH_BYTES
from casty_sa.transfer.compare import compare
from casty_sa.transfer.endpoint import Endpoint
from casty_sa.transfer.history import check_entity_ids, check_one_history
from casty_sa.transfer.values import (
    DEFAULT_BATCH_SIZE,
    Batch,
    JournalStats,
    Progress,
    ProgressCallback,
    TransferReport,
)

__all__ = ["copy_journal"]

log = logging.getLogger(__package__)  # the package's one logger, "casty_sa.transfer"


async def copy_journal(
    source: Endpoint,
    target: Endpoint,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    on_progress: ProgressCallback | None = None,
) -> TransferReport:
    """Copy every event and snapshot of ``source`` that ``target`` lacks, then verify.

    Events go first, in key order, one target transaction per batch;
    snapshots follow, so a snapshot never gets ahead of the events it
    summarizes. An exception (Ctrl-C, a lost connection) leaves whole batches
    behind; calling again copies the rest.

    Parameters
    ----------
    source, target : Endpoint
        A :class:`CastyFile` or a :class:`JournalDatabase`, either way round.
    batch_size : int
        Rows read and written per batch.
    batch_bytes : int
        Most bytes of rows per batch (as the journal's group commit counts
        them); a single larger row goes alone. Large events thus never add up
        to a statement the database refuses (PostgreSQL's 1 GiB per message),
        nor to a batch that does not fit in memory.
    on_progress : Callable[[Progress], None] | None
        Called after every batch.

    Returns
    -------
    TransferReport
        Counts of the run and the verification: ``report.verified`` is true
        when every source event is in the target with the same payload bytes
        and timestamp, and every source snapshot is there the same or newer.
        ``report.refused`` is true when the target already held another
        history, or rows of the source's entities the source cannot vouch
        for by content (see :mod:`casty_sa.transfer`): then nothing was written.

    Raises
    ------
    InvalidEventError
        The source holds an entity id the journal refuses; nothing is copied.
    """
    if batch_size < 1 or batch_bytes < 1:
        raise ValueError(
            f"batch_size and batch_bytes must be at least 1, not {batch_size}, {batch_bytes}"
        )
    batch = Batch(batch_size, batch_bytes)
    started = time.perf_counter()
    before = await source.stats()
    check_entity_ids(before)
    already = await target.stats()
    _log_start(source, target, before, already)
    refusal = await _refuse_two_histories(source, target, batch, before, already, started)
    if refusal is not None:
        return refusal
    run = _Run(batch, Progress(0, before.event_count, 0, len(before.snapshots)), on_progress)
    await _copy_events(source, target, before, already, run)
    run.progress = replace(run.progress, events_done=run.progress.events_total)
    await _copy_snapshots(source, target, already, run)
    return await _verify(source, target, before, run, started)


@dataclass(slots=True)
class _Run:
    """A copy under way: its batch limits, how far it is, and its running totals."""

    batch: Batch
    progress: Progress
    on_progress: ProgressCallback | None
    events_seen: int = 0
    events_copied: int = 0
    snapshots_seen: int = 0
    snapshots_copied: int = 0

    def advance(self, **done: int) -> None:
        """Move :attr:`progress` on (``events_done``, ``snapshots_done``); tell the callback."""
        self.progress = replace(self.progress, **done)
        if self.on_progress is not None:
            self.on_progress(self.progress)


def _log_start(source: Endpoint, target: Endpoint, src: JournalStats, dst: JournalStats) -> None:
    log.debug(
        "copy %s -> %s: source has %d events of %d entities and %d snapshots; target has %d "
        "events of %d entities",
        source.name,
        target.name,
        src.event_count,
        len(src.events),
        len(src.snapshots),
        dst.event_count,
        len(dst.events),
    )


async def _refuse_two_histories(
    source: Endpoint,
    target: Endpoint,
    batch: Batch,
    before: JournalStats,
    already: JournalStats,
    started: float,
) -> TransferReport | None:
    """The refusal, before anything is written, when a shared entity is not one history.

    What the target holds of the source's entities must be the source's own
    history, or the copy would leave a history mixing both.
    """
    shared = (before.events.keys() | before.snapshots.keys()) & (
        already.events.keys() | already.snapshots.keys()
    )
    if not shared:
        return None
    forks = await compare(source, target, batch, only=shared, missing_ok=True)
    await check_one_history(target, before, already, shared, forks)
    if not forks.count:
        return None
    log.debug("copy %s -> %s refused: %d entities differ", source.name, target.name, forks.count)
    return TransferReport(
        source=source.name,
        target=target.name,
        entities=before.entity_count,
        events=before.event_count,
        snapshots=len(before.snapshots),
        events_copied=0,
        events_present=0,
        snapshots_copied=0,
        snapshots_present=0,
        forks=tuple(forks.differences),
        fork_count=forks.count,
        seconds=time.perf_counter() - started,
    )


async def _verify(
    source: Endpoint, target: Endpoint, before: JournalStats, run: _Run, started: float
) -> TransferReport:
    """The report of a finished copy, with every source row compared with the target's."""
    after = await source.stats()
    check = await compare(source, target, run.batch, only=None, missing_ok=False)
    target_ahead = _target_ahead(after, await target.stats())
    seconds = time.perf_counter() - started
    log.debug("copy %s -> %s finished in %.3fs", source.name, target.name, seconds)
    return TransferReport(
        source=source.name,
        target=target.name,
        entities=after.entity_count,
        events=check.events_seen,
        snapshots=check.snapshots_seen,
        events_copied=run.events_copied,
        events_present=run.events_seen - run.events_copied,
        snapshots_copied=run.snapshots_copied,
        snapshots_present=run.snapshots_seen - run.snapshots_copied,
        mismatches=tuple(check.differences),
        mismatch_count=check.count,
        target_ahead=target_ahead,
        source_changed=after != before,
        seconds=seconds,
        events_compared=check.events_compared,
        snapshots_compared=check.snapshots_compared,
        snapshots_newer=check.snapshots_newer,
        zero_signs_lost=check.zero_signs_lost,
    )


async def _copy_events(
    source: Endpoint,
    target: Endpoint,
    src: JournalStats,
    dst: JournalStats,
    run: _Run,
) -> None:
    """Copy events batch by batch, skipping what the target provably holds."""
    held = _held_up_to(src, dst)
    after: tuple[str, int] | None = None
    while True:
        read_started = time.perf_counter()
        rows = await source.read_events(after, run.batch.rows, run.batch.bytes)
        if not rows:
            return
        read_seconds = time.perf_counter() - read_started
        missing = [row for row in rows if row.sequence_nr > held.get(row.entity_id, 0)]
        write_started = time.perf_counter()
        copied = await target.write_events(missing) if missing else 0
        log.debug(
            "events: read %d in %.1f ms, sent %d, %d new, in %.1f ms",
            len(rows),
            read_seconds * 1000,
            len(missing),
            copied,
            (time.perf_counter() - write_started) * 1000,
        )
        run.events_seen += len(rows)
        run.events_copied += copied
        after = (rows[-1].entity_id, rows[-1].sequence_nr)
        run.advance(events_done=min(run.events_seen, run.progress.events_total))


async def _copy_snapshots(source: Endpoint, target: Endpoint, dst: JournalStats, run: _Run) -> None:
    """Copy snapshots the target lacks or holds at a lower sequence number."""
    after: str | None = None
    while True:
        rows = await source.read_snapshots(after, run.batch.rows, run.batch.bytes)
        if not rows:
            return
        newer = [row for row in rows if row.sequence_nr > dst.snapshots.get(row.entity_id, -1)]
        copied = await target.write_snapshots(newer) if newer else 0
        log.debug("snapshots: read %d, sent %d, %d written", len(rows), len(newer), copied)
        run.snapshots_seen += len(rows)
        run.snapshots_copied += copied
        after = rows[-1].entity_id
        run.advance(snapshots_done=min(run.snapshots_seen, run.progress.snapshots_total))


def _held_up_to(src: JournalStats, dst: JournalStats) -> dict[str, int]:
    """Per entity, the sequence number up to which the target provably holds every event.

    That is the case when the target's events of the entity form an unbroken run
    starting at or below the source's first: every source event up to the run's
    end is there, and need not be sent again.
    """
    held: dict[str, int] = {}
    for entity, theirs in dst.events.items():
        ours = src.events.get(entity)
        if ours is not None and theirs.contiguous and theirs.first <= ours.first:
            held[entity] = theirs.last
    return held


def _target_ahead(src: JournalStats, dst: JournalStats) -> int:
    """Entities for which the target holds more events than the source."""
    return sum(
        1
        for entity, ours in src.events.items()
        if (theirs := dst.events.get(entity)) is not None and theirs.events > ours.events
    )
