"""The read side: every event in the global order, entity ids, an entity's last number.

:meth:`SAJournal.events <casty_sa.SAJournal.events>` hands out an
:class:`EventStream`: pages of committed events in the order
``(era, transaction_id, position)`` (:mod:`casty_sa.ordering`), each event in an
:class:`EventEnvelope` whose ``offset`` a reader stores to resume from. A backend
returns with each page its horizon: every row at or below it was committed and
looked at, so the stream moves its cursor there and never passes a row that may
still commit. ``live=False`` stops at the horizon of its first page (what was
committed when it started); ``live=True`` waits for more (:mod:`casty_sa.live`).

``journal.events(after=None, *, live=False, batch_size=1000, entity_prefix=None,
event_types=None)``:

``after``
    Resume after this offset (``None``: from the first event).
``live``
    ``False``: stop at what was committed when the call started (on PostgreSQL: up
    to the oldest write transaction then running). ``True``: go on, waiting for new
    events, woken by this journal's commits at once, by ``NOTIFY`` on PostgreSQL, and
    by polling (1 s on PostgreSQL, 50 ms on SQLite; sooner on PostgreSQL while a
    running transaction holds back events committed after it).
``batch_size``
    Events read per query (an int from 1 to 100,000).
``entity_prefix``
    Only entities whose id starts with this string (compared as text: ``%`` and
    ``_`` are plain characters).
``event_types``
    Only events of these types, named as :func:`casty_sa.ordering.event_type_name`
    names them (``"app.Deposited"``, ``"str"``). Rows stored without a type (before
    migration 0002, or copied from a casty file) or with a cut one are decoded to tell.

Errors: :class:`~casty_sa.ordering.InvalidOffset` for an ``after`` that is no offset
(at the call, before any I/O), or that is ahead of everything the database can have
handed out (at the first step): an era above the current one, or on PostgreSQL a
transaction id not below the server's next one, or on SQLite a place past the newest
event stored. An offset of another database that falls within this one's range
cannot be told apart. :class:`~casty_sa.errors.PayloadDecodeError` (naming entity and
sequence number) for an event the deserializer fails on;
:class:`~casty_sa.errors.JournalClosed` once the journal is closed, also for a live
reader waiting then; the journal's usual database errors (after its read retries).

A stream holds no connection between two ``__anext__`` calls: leaving the loop
(``break``, an exception, a cancelled task) leaves nothing open but its share of
the live readers' listening connection, which goes when the stream is closed or
collected (``async with journal.events(...) as stream`` closes it at once).

Examples
--------
>>> import asyncio
>>> from casty import PersistedEvent
>>> from casty_sa import SAJournal
>>> async def main() -> list[tuple[str, int, object]]:
...     async with SAJournal("sqlite://") as journal:
...         await journal.persist("acct-1", [PersistedEvent(1, "opened", 1.5)])
...         await journal.persist("acct-2", [PersistedEvent(1, "opened", 2.5)])
...         return [(e.entity_id, e.sequence_nr, e.event) async for e in journal.events()]
>>> asyncio.run(main())
[('acct-1', 1, 'opened'), ('acct-2', 1, 'opened')]
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable, Collection
from types import TracebackType
from typing import Any, NamedTuple, Self

from casty_sa.backends import Backend
from casty_sa.backends.read_statements import TOP, EventPage, Place
from casty_sa.envelopes import EventEnvelope, envelopes
from casty_sa.errors import JournalClosed
from casty_sa.lifecycle import Lifecycle
from casty_sa.live import Wakeups
from casty_sa.ordering import (
    stored_type_name,
)
from casty_sa.read_checks import check_offset, check_text, check_types, refuse_ahead
from casty_sa.reads import RetryingReader

__all__ = ["MAX_BATCH_SIZE", "Backlog", "EventStream", "ReadSide"]

#: Most events one page may ask for.
MAX_BATCH_SIZE = 100_000
#: Entity ids one page of :meth:`ReadSide.entity_ids` walks.
_ID_PAGE = 1000
#: First pause of a live reader whose horizon is held back by a running transaction
#: while later commits wait (no notification comes when an unrelated one ends).
_BLOCKED_POLL = 0.01


class Backlog(NamedTuple):
    """``events`` after an offset (counted up to a limit) and the oldest ``timestamp`` among
    them (``None``: no event follows)."""

    events: int
    oldest_timestamp: float | None


class ReadSide:
    """The journal's read-side calls (see the module docstring).

    Parameters
    ----------
    backend : Backend
        Whose statements run.
    reads : RetryingReader
        Runs them with the journal's retries and time budget.
    deserialize : Callable
        The journal's deserializer.
    wakeups : Wakeups
        What wakes live readers.
    life : Lifecycle
        The journal's start (connect, check the schema) and whether it was closed.
    """

    def __init__(
        self,
        backend: Backend,
        reads: RetryingReader,
        deserialize: Callable[[bytes], Any],
        wakeups: Wakeups,
        life: Lifecycle,
    ) -> None:
        self.backend = backend
        self.reads = reads
        self.deserialize = deserialize
        self.wakeups = wakeups
        self._life = life

    async def ready(self) -> None:
        """Start the journal if needed; refuse a call once it is closed."""
        await self._life.start()

    def events(
        self,
        after: str | None,
        *,
        live: bool,
        batch_size: int,
        entity_prefix: str | None,
        event_types: Collection[str] | None,
    ) -> EventStream:
        """An :class:`EventStream`, every argument checked before any I/O."""
        place = None if after is None else check_offset(after)
        if type(live) is not bool:
            raise TypeError(f"live must be True or False, not {live!r}")
        if type(batch_size) is not int or not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise ValueError(
                f"batch_size must be an int from 1 to {MAX_BATCH_SIZE}, not {batch_size!r}"
            )
        prefix = check_text("entity_prefix", entity_prefix) or None
        types = check_types(event_types)
        return EventStream(self, place, live=live, limit=batch_size, prefix=prefix, types=types)

    async def backlog(
        self,
        after: str | None,
        *,
        limit: int,
        entity_prefix: str | None = None,
        event_types: Collection[str] | None = None,
    ) -> Backlog:
        """How many events follow ``after`` (up to ``limit``), filtered as :meth:`events` does
        (``entity_prefix``, ``event_types``; unknown types counted), the oldest one's time."""
        place = (0, 0, -(2**63)) if after is None else check_offset(after)
        if type(limit) is not int or not 1 <= limit <= MAX_BATCH_SIZE:
            raise ValueError(f"limit must be an int from 1 to {MAX_BATCH_SIZE}, not {limit!r}")
        prefix = check_text("entity_prefix", entity_prefix) or None
        types = check_types(event_types)
        stored = None if types is None else sorted({stored_type_name(t) for t in types})
        await self.ready()
        args = (place, limit, prefix, stored)
        return Backlog(*await self.reads.read(self.backend.event_backlog, args, "count events"))

    def entity_ids(self, after: str | None, prefix: str | None) -> AsyncIterator[str]:
        """Entity ids after ``after`` (with ``prefix``), in the column's order.

        Read in pages of 1,000, one index probe per id (a walk through the primary
        key, never a scan of the events). Where the column sorts by bytes (SQLite;
        PostgreSQL with a ``C`` collation) the walk starts at the prefix and stops
        after its last id. Under another collation the ids with a prefix need not be
        contiguous, nor sort after the prefix, so the walk goes over every id after
        ``after`` (one probe each) and keeps those that start with it: never one
        missed, at the cost of the whole walk.
        """
        start = check_text("after", after) or ""
        return self._entity_ids(start, check_text("prefix", prefix) or None)

    async def _entity_ids(self, after: str, prefix: str | None) -> AsyncIterator[str]:
        while True:
            await self.ready()
            ids = await self.reads.read(
                self.backend.entity_id_page, (after, _ID_PAGE, prefix), "list entity ids"
            )
            for entity_id in ids:
                if prefix is None or entity_id.startswith(prefix):
                    yield entity_id
            if len(ids) < _ID_PAGE:
                return
            after = ids[-1]

    async def highest_sequence_nr(self, entity_id: str) -> int:
        """The highest sequence number stored for ``entity_id`` (0: none)."""
        await self.ready()
        return await self.reads.read(
            self.backend.highest_sequence_nr,
            (entity_id,),
            f"read the highest sequence number of {entity_id!r}",
        )


class EventStream:
    """An async iterator of :class:`EventEnvelope` in the global order (see the module).

    Also an async context manager; :meth:`aclose` ends it at once.
    """

    def __init__(
        self,
        side: ReadSide,
        after: Place | None,
        *,
        live: bool,
        limit: int,
        prefix: str | None,
        types: frozenset[str] | None,
    ) -> None:
        self._side = side
        self._after = after  # checked against the database's first answer
        self._cursor: Place = (0, 0, -(2**63)) if after is None else after
        self._stop = TOP
        self._live = live
        self._limit = limit
        self._prefix = prefix
        self._types = types
        # what the event_type column holds for the wanted types (long names cut)
        self._stored = None if types is None else sorted({stored_type_name(t) for t in types})
        self._ready: collections.deque[EventEnvelope] = collections.deque()
        self._done = False
        self._joined = False  # counted among the live readers of the journal's Wakeups
        self._blocked = 0  # pages in a row held back by a running transaction
        self._ahead: asyncio.Future[tuple[int, EventPage]] | None = None  # the next page
        #: live, and waiting for commits: every event committed so far was handed out
        self.caught_up = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> EventEnvelope:
        while not self._ready:
            if self._done:
                self._leave()
                raise StopAsyncIteration
            try:
                await self._advance()
            except BaseException as exc:
                # cancelled, or failed: the traceback may keep this stream alive a while,
                # so it gives up its share of the listener now (a next call joins again)
                self._leave()
                self._drop_ahead()
                if isinstance(exc, JournalClosed):
                    self._done = True
                raise
        return self._ready.popleft()

    @property
    def buffered(self) -> int:
        """How many envelopes the stream hands out next without I/O: a consumer that commits
        in batches commits when it reaches 0 instead of holding events while it waits."""
        return len(self._ready)

    def take(self, limit: int) -> list[EventEnvelope]:
        """Up to ``limit`` of the envelopes the stream holds, without I/O (what ``limit``
        calls of ``__anext__`` would give while :attr:`buffered` lasts)."""
        ready = self._ready
        return [ready.popleft() for _ in range(min(limit, len(ready)))]

    async def aclose(self) -> None:
        """End the stream and give up its share of the live readers' listening connection."""
        self._done = True
        self._ready.clear()
        self._drop_ahead()
        self._leave()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        self._leave()

    def _leave(self) -> None:
        if self._joined:
            self._joined = False
            self._side.wakeups.leave()

    async def _advance(self) -> None:
        """Read the next page; when live and caught up, wait for a commit."""
        await self._side.ready()
        ahead, self._ahead = self._ahead, None
        ticket, page = await (ahead if ahead is not None else self._read(self._cursor))
        if self._after is not None:
            refuse_ahead(self._after, page.ceiling)
            self._after = None
        if not self._live and self._stop == TOP:
            self._stop = page.horizon  # what was committed when the stream started
        self.caught_up = False
        if len(page.rows) == self._limit:
            # a full page: where reads run beside the loop (a server, a pool), the next one is
            # read while this one is decoded; a page that fails to decode is read again
            era, transaction_id, position = page.rows[-1][:3]
            if self._side.backend.read_concurrency > 1:
                self._ahead = asyncio.ensure_future(self._read((era, transaction_id, position)))
                self._ahead.add_done_callback(_retrieved)
            try:
                self._ready.extend(envelopes(page.rows, self._side.deserialize, self._types))
            except BaseException:
                self._drop_ahead()
                raise
            self._cursor = (era, transaction_id, position)
            return
        self._ready.extend(envelopes(page.rows, self._side.deserialize, self._types))
        # every row up to the horizon was looked at
        self._cursor = max(self._cursor, min(page.horizon, self._stop))
        if not self._live:
            self._done = True
        elif not self._ready:
            # until a page brings rows again; never while a running transaction holds
            # committed rows back (the reader is behind them, however old they get)
            self.caught_up = not page.blocked
            await self._wait(ticket, page.blocked)

    async def _read(self, cursor: Place) -> tuple[int, EventPage]:
        """The page after ``cursor``, and the wake-up ticket taken before reading it."""
        side = self._side
        # a page read ahead runs in a task of its own: one that starts once close() began is
        # refused here (close() marks the journal closed before it waits for the reads in
        # flight, and a read that passes this check is tracked by the journal in this step)
        await side.ready()
        ticket = side.wakeups.ticket()
        page: EventPage = await side.reads.read(
            side.backend.event_page,
            (cursor, self._stop, self._limit, self._prefix, self._stored),
            "read events",
        )
        return ticket, page

    def _drop_ahead(self) -> None:
        """Forget the page being read ahead (its read finishes, or is cut, on its own)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.cancel()

    async def _wait(self, ticket: int, blocked: bool) -> None:
        """Caught up: wait for a commit, the database's word, or the next poll."""
        wakeups = self._side.wakeups
        if not self._joined:
            # listen first, then read again: a commit announced before the LISTEN began
            # is seen by that read
            self._joined = True
            await wakeups.join()
            return
        await wakeups.check_listener()  # reopened if it died
        poll = self._side.backend.live_poll
        if blocked:
            # a transaction below committed rows still runs: its end is announced only
            # if it is one of ours, so look again soon
            poll = min(poll, _BLOCKED_POLL * 2**self._blocked)
            self._blocked += 1
        else:
            self._blocked = 0
        await wakeups.wait(ticket, poll)


def _retrieved(task: asyncio.Future[Any]) -> None:
    """A page read ahead and then dropped: its failure was nobody's to see."""
    if not task.cancelled():
        task.exception()
