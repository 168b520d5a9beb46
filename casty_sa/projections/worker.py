"""One slice's loop: read a batch, apply it with the offset in one transaction, go on.

A batch is what the stream hands out without waiting (at most ``batch_size``
events): the worker never holds events in hand while the next page is read or
awaited. Exactly once: one transaction per batch on a session of the read model's
``sessions``, FIRST :meth:`OffsetTable.advance
<casty_sa.projections.offsets.OffsetTable.advance>` (it locks the slice's row and
checks owner, fence and the offset the batch starts from), then the handler for
each of the slice's events (or once with all of them: ``Projection.batched``), then
the commit. At least once: the handler runs
outside any transaction and the offset advances in a short one after the batch.

After ANY error the worker forgets what it had in memory: it re-reads its row
and reads the journal again from the stored offset. That also settles a commit
whose outcome is unknown (the connection dropped during ``COMMIT``): the stored
offset says whether the batch landed.

A handler that fails: the batch rolls back, the events before the failing one
commit as a batch of their own (a batch handler's batch is applied again one event
at a time to find that one), and the failing event is retried alone with an
exponential backoff, each failure logged (logger ``casty_sa.projections``) and
stored in the slice's row (:meth:`OffsetTable.record_error
<casty_sa.projections.offsets.OffsetTable.record_error>`) for ``status()`` and the
CLI; ``on_error="stop"`` raises :class:`~casty_sa.errors.ProjectionFailed` instead.
Database errors take the same backoff. No event is ever skipped.

Examples
--------
>>> slice_of("acct-1", 4), slice_of("acct-1", 1)
(1, 0)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from casty_sa.diagnosis import describe
from casty_sa.envelopes import EventEnvelope
from casty_sa.errors import (
    HandlerOverran,
    JournalClosed,
    PayloadDecodeError,
    ProjectionFailed,
    ProjectionLeaseLost,
)
from casty_sa.event_stream import EventStream
from casty_sa.journal import SAJournal
from casty_sa.projections.guard import TransactionGuard, handler_failure
from casty_sa.projections.leases import Leases
from casty_sa.projections.offsets import Lease, OffsetRow, OffsetTable
from casty_sa.projections.tasks import settled

__all__ = [
    "LEASE_KEY",
    "BatchHandler",
    "Handler",
    "Mode",
    "OutsideHandler",
    "Settings",
    "Worker",
    "slice_of",
]

log = logging.getLogger("casty_sa.projections")

#: Key of ``session.info`` holding the batch's :class:`~casty_sa.projections.offsets.Lease`.
LEASE_KEY = "casty_sa.lease"
#: Fewest events per page the journal reads: small batches (slow handlers) still read fast.
_PAGE = 1000
#: Most characters of an error stored in the offsets table.
_ERROR_TEXT = 2000

Handler = Callable[[AsyncSession, EventEnvelope], Awaitable[object]]
BatchHandler = Callable[[AsyncSession, Sequence[EventEnvelope]], Awaitable[object]]
OutsideHandler = Callable[[EventEnvelope], Awaitable[object]]
#: How the handler is called: ``"event"`` ``handler(session, envelope)`` and ``"batch"``
#: ``handler(session, envelopes)`` in the batch's transaction (exactly once), ``"outside"``
#: ``handler(envelope)`` outside any transaction (at least once).
Mode = Literal["event", "batch", "outside"]


def slice_of(entity_id: str, slices: int) -> int:
    """The slice an entity's events go to: ``zlib.crc32`` of its UTF-8 id, modulo ``slices``."""
    return zlib.crc32(entity_id.encode("utf-8")) % slices


@dataclass(frozen=True, slots=True)
class Settings:
    """What every worker of one ``Projection`` works with (checked by ``Projection``)."""

    name: str
    journal: SAJournal
    handler: Handler | BatchHandler | OutsideHandler
    mode: Mode
    sessions: async_sessionmaker[AsyncSession]
    table: OffsetTable
    batch_size: int
    entity_prefix: str | None
    event_types: Collection[str] | None
    slices: int
    on_error: Literal["retry", "stop"]
    retry_delay: float
    max_retry_delay: float
    secrets: frozenset[str] = frozenset()  # of the journal's and the read model's URLs

    @property
    def exactly_once(self) -> bool:
        """Whether the handler's writes commit with the offset."""
        return self.mode != "outside"

    def describe(self, exc: BaseException) -> str:
        """``exc`` in a line for the log and the offsets table: no SQL, no parameters (the
        read model's data) and no password of the journal's or the read model's URL."""
        return describe(exc, self.secrets)

    def stream(self, after: str | None, live: bool) -> EventStream:
        """The journal's events after ``after`` as this projection reads them."""
        return self.journal.events(
            after,
            live=live,
            batch_size=max(self.batch_size, _PAGE),
            entity_prefix=self.entity_prefix,
            event_types=self.event_types,
        )


class _SplitBatch(Exception):
    """The batch handler raised on a batch of several events (rolled back): which event
    it fails on is found by applying them one at a time."""


class _HandlerFailed(Exception):
    """The handler raised on ``batch[index]`` (the batch was rolled back)."""

    def __init__(self, index: int, envelope: EventEnvelope) -> None:
        super().__init__(index)
        self.index = index
        self.envelope = envelope


class Worker:
    """Applies one slice's events while its lease is held (see the module docstring).

    ``idle`` is true while it waits (for events, or a backoff): ``stop()`` cancels
    it then; otherwise it finishes its batch and sees ``stopping`` before the next.
    """

    def __init__(self, settings: Settings, leases: Leases, index: int, stopping: asyncio.Event):
        self.settings = settings
        self.leases = leases
        self.index = index
        self.stopping = stopping
        self.idle = False
        self.handled = 0
        self._attempt = 0  # failures in a row
        self._solo_until: str | None = None  # batches of one event up to this offset
        self._uncertain: tuple[str, int] | None = None  # a commit of unknown outcome
        self.lag = settings.journal.metrics.slice_lag(settings.name, index)  # (metrics)

    async def work(self, live: bool) -> int:
        """Apply the slice's events (``live``: until stopped; else those committed when it
        began); the number handled. :class:`ProjectionLeaseLost` when the slice is lost."""
        while not self.stopping.is_set():
            try:
                await self._follow(await self._stored_offset(), live)
                return self.handled
            except (ProjectionLeaseLost, JournalClosed, ProjectionFailed):
                raise
            except _HandlerFailed as failed:
                await self._failed(failed.envelope, failed.__cause__)
            except _SplitBatch as split:
                slow = isinstance(split.__cause__, HandlerOverran)  # lease_seconds too short
                log.log(
                    logging.WARNING if slow else logging.INFO,
                    "projection %r slice %d: the batch handler failed (%s); applying the "
                    "batch's events one at a time to find the event it fails on",
                    self.settings.name,
                    self.index,
                    self.settings.describe(split.__cause__ or split),
                )
            except Exception as exc:  # noqa: BLE001 - every failure backs off, never skips
                await self._failed(None, exc)
        return self.handled

    async def _stored_offset(self) -> str | None:
        """The slice's offset as stored, its lease checked (nothing in memory is trusted)."""
        lease = await self._lease()
        settings = self.settings
        row = await settled(self._row())
        if row.owner != lease.owner or row.fence != lease.fence:
            raise ProjectionLeaseLost(
                f"slice {self.index} of projection {settings.name!r} was taken over or reset"
            )
        if self._uncertain is not None:
            offset, count = self._uncertain
            self._uncertain = None
            landed = row.last_offset == offset
            self.handled += count if landed else 0
            log.warning(
                "projection %r slice %d: the commit of a batch up to offset %s failed; the "
                "stored offset shows it %s",
                settings.name,
                self.index,
                offset,
                "landed" if landed else "did not land (it is applied again)",
            )
        return row.last_offset

    async def _row(self) -> OffsetRow:
        settings = self.settings
        async with settings.sessions() as session:
            [row] = await settings.table.rows(session, settings.name, self.index)
        return row

    async def _lease(self) -> Lease:
        lease = await self.leases.revived(self.index)
        if lease is None:
            raise ProjectionLeaseLost(
                f"slice {self.index} of projection {self.settings.name!r}: the lease was "
                "lost or not renewed in time; the worker stops applying"
            )
        return lease

    async def _follow(self, after: str | None, live: bool) -> None:
        async with self.settings.stream(after, live) as stream:
            self.lag.following(stream)
            while not self.stopping.is_set():
                batch = await self._take(stream)
                if not batch:
                    return
                self.lag.holding(batch[0].timestamp)
                lease = await self._lease()
                # a batch runs to its end (commit or rollback) before a cancellation passes
                await settled(self._apply(lease, after, batch))
                self.lag.applied()
                after = batch[-1].offset
                self._attempt = 0
                if self._solo_until is not None and after >= self._solo_until:
                    self._solo_until = None

    async def _take(self, stream: EventStream) -> list[EventEnvelope]:
        """The next batch: one event awaited, then what the stream holds in memory."""
        self.idle = True
        try:
            if self.stopping.is_set():
                return []
            first = await anext(stream, None)
        finally:
            self.idle = False
        if first is None:
            return []
        if self._solo_until is not None and first.offset <= self._solo_until:
            return [first]
        return [first, *stream.take(self.settings.batch_size - 1)]

    def _mine(self, envelope: EventEnvelope) -> bool:
        slices = self.settings.slices
        return slices == 1 or slice_of(envelope.entity_id, slices) == self.index

    async def _apply(self, lease: Lease, after: str | None, batch: list[EventEnvelope]) -> None:
        if self.settings.exactly_once:
            await self._in_transaction(lease, after, batch)
        else:
            await self._then_offset(lease, after, batch)

    async def _in_transaction(
        self, lease: Lease, after: str | None, batch: list[EventEnvelope]
    ) -> None:
        """Exactly once: the offset, the handler's writes, one commit."""
        settings = self.settings
        mine = [self._mine(envelope) for envelope in batch]
        started = time.monotonic()
        async with settings.sessions() as session:
            session.info[LEASE_KEY] = lease
            await settings.table.advance(
                session, lease, after, batch[-1].offset, sum(mine), self.leases.lease_ms
            )
            guard = TransactionGuard(session, self.leases.lease_seconds)
            if settings.mode == "batch":
                await self._handle_batch(session, guard, lease, after, batch, mine)
            else:
                await self._handle_each(session, guard, lease, after, batch, mine)
            guard.disarm()
            self._uncertain = (batch[-1].offset, sum(mine))
            await session.commit()
            self._uncertain = None
        self.handled += sum(mine)
        self.leases.extended(lease, started)

    async def _handle_each(
        self,
        session: AsyncSession,
        guard: TransactionGuard,
        lease: Lease,
        after: str | None,
        batch: list[EventEnvelope],
        mine: list[bool],
    ) -> None:
        handler: Any = self.settings.handler
        for index, envelope in enumerate(batch):
            if mine[index]:
                try:
                    await guard.call(handler(session, envelope))
                except BaseException as exc:  # the handler's failure, whatever it is
                    if not handler_failure(exc):
                        raise
                    await session.rollback()
                    await self._commit_before(lease, after, batch, index, exc)

    async def _handle_batch(
        self,
        session: AsyncSession,
        guard: TransactionGuard,
        lease: Lease,
        after: str | None,
        batch: list[EventEnvelope],
        mine: list[bool],
    ) -> None:
        """One call with the slice's events of the batch; on a failure with several, the
        batch is applied again one event at a time (no backoff: nothing is known yet)."""
        handler: Any = self.settings.handler
        events = [envelope for envelope, wanted in zip(batch, mine, strict=True) if wanted]
        if not events:
            return
        try:
            await guard.call(handler(session, events))
        except BaseException as exc:  # the handler's failure, whatever it is
            if not handler_failure(exc):
                raise
            await session.rollback()
            if len(events) > 1:
                self._solo_until = batch[-1].offset
                raise _SplitBatch from exc
            await self._commit_before(lease, after, batch, mine.index(True), exc)

    async def _then_offset(
        self, lease: Lease, after: str | None, batch: list[EventEnvelope]
    ) -> None:
        """At least once: the handler outside any transaction, then the offset."""
        handler: Any = self.settings.handler
        applied = 0
        for index, envelope in enumerate(batch):
            if self._mine(envelope):
                try:
                    await handler(envelope)
                except BaseException as exc:  # the handler's failure, whatever it is
                    if not handler_failure(exc):
                        raise
                    await self._commit_before(lease, after, batch, index, exc)
                applied += 1
        await self._advance_only(lease, after, batch, applied)

    async def _advance_only(
        self, lease: Lease, after: str | None, batch: list[EventEnvelope], applied: int
    ) -> None:
        settings = self.settings
        started = time.monotonic()
        async with settings.sessions() as session:
            await settings.table.advance(
                session, lease, after, batch[-1].offset, applied, self.leases.lease_ms
            )
            self._uncertain = (batch[-1].offset, applied)
            await session.commit()
            self._uncertain = None
        self.handled += applied
        self.leases.extended(lease, started)

    async def _commit_before(
        self,
        lease: Lease,
        after: str | None,
        batch: list[EventEnvelope],
        index: int,
        exc: BaseException,
    ) -> None:
        """The handler failed on ``batch[index]``: the events before it commit as a batch of
        their own (exactly once: applied again), then :class:`_HandlerFailed`."""
        if index > 0:
            before = batch[:index]
            if self.settings.exactly_once:
                await self._in_transaction(lease, after, before)
            else:
                await self._advance_only(lease, after, before, sum(map(self._mine, before)))
        raise _HandlerFailed(index, batch[index]) from exc

    async def _failed(self, envelope: EventEnvelope | None, exc: BaseException | None) -> None:
        """Log and store the failure, then stop (``on_error="stop"``) or back off."""
        settings = self.settings
        self._attempt += 1
        what = "a database or journal error"
        if envelope is not None:
            self._solo_until = envelope.offset
            what = (
                f"the handler failed on entity {envelope.entity_id!r} sequence number "
                f"{envelope.sequence_nr} at offset {envelope.offset}"
            )
        text = f"{what}: {settings.describe(exc) if exc is not None else 'unknown'}"
        fatal = envelope is not None or isinstance(exc, PayloadDecodeError)
        if fatal and settings.on_error == "stop":
            log.warning("projection %r slice %d: %s; stopping", settings.name, self.index, text)
            await self._record(text)
            raise ProjectionFailed(
                f"projection {settings.name!r} slice {self.index} stopped: {text}. Nothing of "
                "that event is stored; the offset stands just before it"
            ) from exc
        delay = min(settings.retry_delay * 2 ** (self._attempt - 1), settings.max_retry_delay)
        log.warning(
            "projection %r slice %d: %s (attempt %d); retrying in %.2fs",
            settings.name,
            self.index,
            text,
            self._attempt,
            delay,
        )
        await self._record(text)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), delay)

    async def _record(self, text: str) -> None:
        """Store the failure in the slice's row (best effort: the log has it anyway)."""
        held = self.leases.held.get(self.index)  # even if it ran out: owner and fence decide
        if held is None:
            return
        lease = held.lease
        settings = self.settings
        try:
            await settled(self._store_error(lease, text[:_ERROR_TEXT]))
        except Exception as exc:  # noqa: BLE001 - the log has it
            log.warning(
                "projection %r slice %d: storing the error failed: %s",
                settings.name,
                self.index,
                settings.describe(exc),
            )

    async def _store_error(self, lease: Lease, text: str) -> None:
        settings = self.settings
        async with settings.sessions() as session:
            await settings.table.record_error(session, lease, text)
            await session.commit()
