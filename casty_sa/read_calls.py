"""The read-side calls of :class:`~casty_sa.SAJournal`: ``events``, ``backlog``,
``entity_ids``, ``highest_sequence_nr`` (the work is :class:`casty_sa.event_stream.ReadSide`'s)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from typing import Any

from casty_sa.codec import check_entity_id
from casty_sa.event_stream import Backlog, EventStream, ReadSide

__all__ = ["ReadSideCalls"]


class ReadSideCalls:
    """The read-side calls of :class:`SAJournal` (see :mod:`casty_sa.event_stream`)."""

    _read_side: ReadSide

    def events(
        self,
        after: str | None = None,
        *,
        live: bool = False,
        batch_size: int = 1000,
        entity_prefix: str | None = None,
        event_types: Collection[str] | None = None,
    ) -> EventStream:
        """Every committed event in one global order, as ``EventEnvelope`` s (each entity's
        in sequence order); resuming after an envelope's ``offset`` gives every later
        event exactly once. ``live=False`` stops at what was committed when the call
        started; ``live=True`` waits for more. See :mod:`casty_sa.event_stream` for the
        parameters, the errors and the guarantees.

        Examples
        --------
        >>> async def follow(journal: SAJournal, offset: str | None) -> None:
        ...     async for envelope in journal.events(offset, live=True):
        ...         print(envelope.entity_id, envelope.event)
        ...         offset = envelope.offset  # store it to resume from it
        """
        return self._read_side.events(
            after,
            live=live,
            batch_size=batch_size,
            entity_prefix=entity_prefix,
            event_types=event_types,
        )

    async def backlog(
        self, after: str | None = None, *, limit: int = 10_000, **filters: Any
    ) -> Backlog:
        """How many events follow ``after`` (counted up to ``limit``) and the oldest one's
        ``timestamp``: a reader's lag (see :meth:`casty_sa.event_stream.ReadSide.backlog`)."""
        return await self._read_side.backlog(after, limit=limit, **filters)

    def entity_ids(
        self, after: str | None = None, *, prefix: str | None = None
    ) -> AsyncIterator[str]:
        """Ids of the entities with events after ``after``, in the database's order; ``prefix``
        is compared as text (see :meth:`casty_sa.event_stream.ReadSide.entity_ids`)."""
        return self._read_side.entity_ids(after, prefix)

    async def highest_sequence_nr(self, entity_id: str) -> int:
        """The entity's highest stored sequence number; 0 for an unknown entity."""
        check_entity_id(entity_id)
        return await self._read_side.highest_sequence_nr(entity_id)
