"""Group commit: concurrent writes that queue up share one transaction.

A single flusher task drains the queue. Whatever arrived while a transaction
was in flight is written together in the next one, up to ``max_batch_events``
events, so throughput grows with concurrency while each caller still returns
only after its own rows are committed. The journal's ``write`` function
decides the outcome of each request separately, so one caller's failure never
fails its neighbours.

Cancelling a caller that is still queued removes its request (nothing is
written); cancelling one whose transaction is already in flight does not stop
that transaction (all or nothing, decided by the database).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from casty_sa.errors import JournalClosed

__all__ = ["GroupCommitter", "WriteRequest"]

log = logging.getLogger("casty_sa.batching")


@dataclass(slots=True, eq=False)
class WriteRequest:
    """One caller's rows: a persist call's events, or one snapshot."""

    entity_id: str
    events: list[tuple[Any, ...]] = field(default_factory=list)
    snapshot: tuple[Any, ...] | None = None
    future: asyncio.Future[None] | None = None

    @property
    def size(self) -> int:
        return len(self.events) + (self.snapshot is not None)


#: A group writer returns, per request, ``None`` (committed) or the error to raise.
GroupWriter = Callable[[Sequence[WriteRequest]], Awaitable[list[BaseException | None]]]


class GroupCommitter:
    """Queue of pending writes with one flusher task and bounded memory.

    Parameters
    ----------
    write : GroupWriter
        Writes a group in one transaction and reports each request's outcome.
    max_batch_events : int
        Most events (plus snapshots) in one transaction. A single request
        larger than this is written alone.
    max_pending : int
        Most requests queued; further callers wait for room (back-pressure).
    linger : float
        Seconds the flusher stays up after the queue empties, waiting for the
        next write (a caller that writes again soon then finds it running,
        with its connection in hand).
    on_idle : Callable | None
        Awaited when the flusher stops (e.g. to give its connection back).
    """

    def __init__(
        self,
        write: GroupWriter,
        *,
        max_batch_events: int,
        max_pending: int,
        linger: float = 0.0,
        on_idle: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if max_batch_events < 1 or max_pending < 1:
            raise ValueError("max_batch_events and max_pending must be >= 1")
        self._write = write
        self._linger = linger
        self._on_idle = on_idle
        self._wakeup = asyncio.Event()
        self._max_batch_events = max_batch_events
        self._max_pending = max_pending
        self._queue: deque[WriteRequest] = deque()
        self._room = asyncio.Event()
        self._room.set()
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False

    async def submit(self, request: WriteRequest) -> None:
        """Queue ``request`` and return once it is committed (or raise its error)."""
        while len(self._queue) >= self._max_pending:
            if self._closed:
                raise JournalClosed("the journal was closed while this write waited for room")
            self._room.clear()
            await self._room.wait()
        if self._closed:
            raise JournalClosed("this SAJournal is closed; create a new one")
        loop = asyncio.get_running_loop()
        request.future = future = loop.create_future()
        self._queue.append(request)
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush(), name="casty_sa-group-commit")
        else:
            self._wakeup.set()
        await future

    async def _flush(self) -> None:
        while True:
            try:
                while await self._work_left():
                    await self._flush_queue()
            finally:
                if self._on_idle is not None:
                    await self._on_idle()
            # a caller that queued while on_idle ran saw this task alive and started none
            if not self._queue:
                return

    async def _work_left(self) -> bool:
        """Whether the queue holds work, waiting up to ``linger`` for some."""
        if self._queue:
            return True
        if self._linger <= 0 or self._closed:
            return False
        self._wakeup.clear()
        try:
            async with asyncio.timeout(self._linger):
                await self._wakeup.wait()
        except TimeoutError:
            pass
        return bool(self._queue)

    async def _flush_queue(self) -> None:
        queue = self._queue
        while queue:
            group: list[WriteRequest] = []
            events = 0
            while queue:
                request = queue[0]
                if request.future is None or request.future.done():
                    queue.popleft()  # its caller was cancelled while queued: never written
                    continue
                if group and events + request.size > self._max_batch_events:
                    break
                group.append(queue.popleft())
                events += request.size
            self._room.set()
            if not group:
                continue
            started = time.perf_counter()
            try:
                outcomes = await self._write(group)
            except BaseException as exc:
                outcomes = [exc] * len(group)
                if isinstance(exc, asyncio.CancelledError):
                    for request in group:
                        _settle(request, exc)
                    raise
            for request, outcome in zip(group, outcomes, strict=True):
                _settle(request, outcome)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "group commit: %d calls, %d rows in %.2f ms",
                    len(group),
                    events,
                    (time.perf_counter() - started) * 1000,
                )

    async def close(self) -> None:
        """Refuse new writes and wait for the queued ones to be written."""
        self._closed = True
        self._room.set()
        self._wakeup.set()
        if self._flusher is not None:
            await asyncio.shield(self._flusher)


def _settle(request: WriteRequest, outcome: BaseException | None) -> None:
    future = request.future
    if future is None or future.done():
        return
    if outcome is None:
        future.set_result(None)
    else:
        future.set_exception(outcome)
