"""Group commit: concurrent writes that queue up share one transaction.

A single flusher task drains the queue. Whatever arrived while a transaction
was in flight is written together in the next one, up to ``max_batch_events``
events and ``max_batch_bytes`` bytes, so throughput grows with concurrency while
each caller still returns only after its own rows are committed. The journal's ``write`` function
decides the outcome of each request separately, so one caller's failure never
fails its neighbours.

Where the database commits concurrent transactions in parallel (PostgreSQL),
up to ``pipeline`` groups are in flight at once: while one commits, the callers
of the previous one wake up and queue again, so the client's work overlaps the
server's. A group never carries an entity that another group in flight
carries, so the calls of one entity are still written one group after the
other, in the order they were made.

When the journal is quiet (nothing queued or in flight, and the last write
carried a single call, as when one entity writes after another), a caller
writes its own call directly, in its own task: no hand-over to the flusher and
back. Calls that arrive meanwhile queue up and go as a group once it is done.
This is only offered where a write cut off by cancellation still completes on
its own (``direct``), as on SQLite, whose driver runs each statement to its
end on the connection's own thread.

Cancelling a caller that is still queued removes its request (nothing is
written); cancelling one whose transaction is already in flight does not stop
that transaction (all or nothing, decided by the database).
"""

from __future__ import annotations

import asyncio
import logging
import operator
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from casty_sa.calls import Inflight
from casty_sa.errors import JournalClosed
from casty_sa.metrics import NO_METRICS, Metrics

__all__ = ["DEFAULT_MAX_BATCH_BYTES", "GroupCommitter", "OneByOne", "WriteRequest", "row_bytes"]

log = logging.getLogger("casty_sa.batching")

#: Queued requests from which an idle pipeline splits the queue into two groups.
_SPLIT_FROM = 32
#: Bytes a row takes beside its entity id and payload (sequence number, timestamp).
ROW_OVERHEAD = 16

#: Default cap on the bytes of one transaction's rows (a group commit, a batch of a copy):
#: far below PostgreSQL's 1 GiB limit on one message, whatever the rows' sizes.
DEFAULT_MAX_BATCH_BYTES = 64 * 2**20


_PAYLOAD = operator.itemgetter(3)


def row_bytes(entity_id: str, payload: bytes) -> int:
    """The bytes a row takes on the wire, as the byte caps count them (UTF-8 entity ids)."""
    # an ASCII id (the common case) has as many bytes as characters: no encoding needed
    size = len(entity_id) if entity_id.isascii() else len(entity_id.encode("utf-8", "replace"))
    return size + len(payload) + ROW_OVERHEAD


@dataclass(slots=True, eq=False)
class WriteRequest:
    """One caller's rows: a persist call's events, or one snapshot."""

    entity_id: str
    events: list[tuple[Any, ...]] = field(default_factory=list)
    snapshot: tuple[Any, ...] | None = None
    future: asyncio.Future[None] | None = None
    #: bytes the rows take on the wire: payloads, entity ids and the fixed-size columns
    nbytes: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        rows = self.events if self.snapshot is None else [*self.events, self.snapshot]
        # every row of a request has its entity id: counted once, payloads summed in C
        self.nbytes = row_bytes(self.entity_id, b"") * len(rows) + sum(
            map(len, map(_PAYLOAD, rows))
        )

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
    max_batch_bytes : int
        Most bytes (:attr:`WriteRequest.nbytes`: payloads and the rest of each
        row) in one transaction, so that many large calls never add up to a
        statement the database refuses (PostgreSQL's messages stop at 1 GiB).
        A single request larger than this is written alone.
    max_pending : int
        Most requests queued; further callers wait for room (back-pressure).
    linger : float
        Seconds the flusher stays up after the queue empties, waiting for the
        next write (a caller that writes again soon then finds it running,
        with its connection in hand).
    on_idle : Callable | None
        Awaited when the flusher stops (e.g. to give its connection back).
    pipeline : int
        Most groups in flight at once (1: each group waits for the previous
        one, right for SQLite's single writer).
    direct : bool
        Let a caller of a quiet journal write its own call (see above); only
        where ``write`` survives its caller's cancellation.
    metrics : Metrics
        Where back-pressure waits are recorded.
    """

    def __init__(
        self,
        write: GroupWriter,
        *,
        max_batch_events: int,
        max_pending: int,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        linger: float = 0.0,
        on_idle: Callable[[], Awaitable[None]] | None = None,
        pipeline: int = 1,
        direct: bool = False,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        if min(max_batch_events, max_pending, max_batch_bytes, pipeline) < 1:
            raise ValueError(
                "max_batch_events, max_batch_bytes, max_pending and pipeline must be >= 1"
            )
        self._pipeline = pipeline
        self._write = write
        self._linger = linger
        self._on_idle = on_idle
        self._wakeup = asyncio.Event()
        self._max_batch_events = max_batch_events
        self._max_batch_bytes = max_batch_bytes
        self._max_pending = max_pending
        self._queue: deque[WriteRequest] = deque()
        self._room = asyncio.Event()
        self._room.set()
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self._direct = direct
        self._metrics = metrics
        metrics.watch_queue(self)  # its depth, observed while it lives
        self._flushing = False  # the flusher is cutting and writing groups
        self._single = True  # the last write carried one call: the load looks sequential
        self._direct_done = asyncio.Event()  # clear while a direct write runs
        self._direct_done.set()

    async def submit(self, request: WriteRequest) -> None:
        """Queue ``request`` and return once it is committed (or raise its error)."""
        if len(self._queue) >= self._max_pending:
            await self._wait_for_room()
        if self._closed:
            raise JournalClosed()
        # while a direct write runs, calls queue behind it: it hands the queue over when done
        direct_running = not self._direct_done.is_set()
        if self._direct and self._single and not (direct_running or self._queue or self._flushing):
            await self._write_directly(request)
            return
        request.future = future = asyncio.get_running_loop().create_future()
        self._queue.append(request)
        if not direct_running:
            self._run_flusher()
        await future

    @property
    def pending(self) -> int:
        """Write calls queued (not yet in a transaction)."""
        return len(self._queue)

    async def _wait_for_room(self) -> None:
        """Back-pressure: wait until the queue holds fewer than ``max_pending`` calls."""
        started = time.perf_counter()
        while len(self._queue) >= self._max_pending:
            if self._closed:
                raise JournalClosed("the journal was closed while this write waited for room")
            self._room.clear()
            await self._room.wait()
        self._metrics.waited_for_room(time.perf_counter() - started)

    def _run_flusher(self) -> None:
        """Start the flusher, or wake it if it lingers."""
        if self._flusher is None or self._flusher.done():
            loop = asyncio.get_running_loop()
            self._flusher = loop.create_task(self._flush(), name="casty_sa-group-commit")
        else:
            self._wakeup.set()

    async def _write_directly(self, request: WriteRequest) -> None:
        """Write one call in the caller's task, then hand over what queued meanwhile."""
        self._direct_done.clear()
        try:
            outcome = (await self._write([request]))[0]
        finally:
            self._direct_done.set()
            if self._queue:
                self._single = False  # others came while it ran: they go as a group
                self._run_flusher()
        if outcome is not None:
            raise outcome

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
        """Write groups cut from the queue until it is empty, up to ``pipeline`` at once."""
        loop = asyncio.get_running_loop()
        running: set[asyncio.Task[None]] = set()
        busy: set[str] = set()  # entities of the groups in flight
        await self._direct_done.wait()  # never beside a direct write
        self._flushing = True
        try:
            while self._queue or running:
                group: list[WriteRequest] = []
                if len(running) < self._pipeline:
                    # a long queue meeting an idle pipeline is split in two, so that the
                    # two halves' commits and callers overlap from the start
                    group = self._cut(busy, split=self._pipeline > 1 and not running)
                if group:
                    # marked busy now, before the next cut, not when the task first runs
                    entities = {request.entity_id for request in group}
                    busy.update(entities)
                    commit = self._commit(group, busy, entities)
                    if self._pipeline == 1:
                        await commit
                    else:
                        running.add(loop.create_task(commit))
                elif running:
                    # wait for a group to finish, or for a request that may fit beside it
                    self._wakeup.clear()
                    arrival = loop.create_task(self._wakeup.wait())
                    try:
                        done, _ = await asyncio.wait(
                            {*running, arrival}, return_when=asyncio.FIRST_COMPLETED
                        )
                    finally:
                        arrival.cancel()
                    running.difference_update(done)
        finally:
            if running:  # cancelled while groups were in flight: they finish on their own
                await asyncio.shield(asyncio.gather(*running, return_exceptions=True))
            self._flushing = False

    def _cut(self, busy: set[str], *, split: bool) -> list[WriteRequest]:
        """The next group: queued requests in order, skipping entities in ``busy``."""
        queue = self._queue
        limit = self._max_batch_events
        if split and len(queue) >= _SPLIT_FROM:
            limit = min(limit, max(1, sum(request.size for request in queue) // 2))
        byte_limit = self._max_batch_bytes
        group: list[WriteRequest] = []
        held_back: list[WriteRequest] = []
        events = nbytes = 0
        while queue:
            request = queue[0]
            if request.future is None or request.future.done():
                queue.popleft()  # its caller was cancelled while queued: never written
            elif request.entity_id in busy:
                held_back.append(queue.popleft())  # after that entity's group, in order
            elif group and (events + request.size > limit or nbytes + request.nbytes > byte_limit):
                break
            else:
                group.append(queue.popleft())
                events += request.size
                nbytes += request.nbytes
        queue.extendleft(reversed(held_back))
        self._room.set()
        return group

    async def _commit(self, group: list[WriteRequest], busy: set[str], entities: set[str]) -> None:
        """Write one group, free its ``entities`` from ``busy``, settle each caller."""
        started = time.perf_counter()
        self._single = len(group) == 1
        try:
            outcomes = await self._write(group)
        except BaseException as exc:
            outcomes = [exc] * len(group)
            if isinstance(exc, asyncio.CancelledError):
                for request in group:
                    _settle(request, exc)
                raise
        finally:
            busy.difference_update(entities)
        for request, outcome in zip(group, outcomes, strict=True):
            _settle(request, outcome)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "group commit: %d calls, %d rows, %d bytes in %.2f ms",
                len(group),
                sum(request.size for request in group),
                sum(request.nbytes for request in group),
                (time.perf_counter() - started) * 1000,
            )

    async def close(self) -> None:
        """Refuse new writes and wait for the queued ones to be written."""
        self._closed = True
        self._room.set()
        self._wakeup.set()
        await self._direct_done.wait()
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


class OneByOne:
    """The committer of a journal without group commit: every call its own transaction.

    The write runs in a task a cancelled caller cannot cut short (see
    :class:`~casty_sa.calls.Inflight`), which ``close()`` then waits for.
    """

    __slots__ = ("_inflight", "_write")

    def __init__(self, write: GroupWriter, inflight: Inflight) -> None:
        self._write = write
        self._inflight = inflight

    async def submit(self, request: WriteRequest) -> None:
        """Write ``request`` alone and return once it is committed (or raise its error)."""
        outcome = (await self._inflight.shielded(self._write([request])))[0]
        if outcome is not None:
            raise outcome

    async def close(self) -> None:
        """Nothing queues here: the writes under way are the journal's inflight tasks."""
