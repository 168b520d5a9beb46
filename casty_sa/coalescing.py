"""Read coalescing: concurrent lookups that queue up go to the database together.

When many entities recover at once (a node restarts, a shard moves), casty
asks the journal for a thousand snapshots and then a thousand event tails
within a few milliseconds. Answering each with its own query costs a driver
round trip (or, on SQLite, a hop to the driver's thread) per entity. A
:class:`ReadCoalescer` lets a few batches run at a time; every lookup that
arrives meanwhile waits for the next free slot and goes out with the others
in one query. An uncontended lookup is sent at once, alone.

A lookup joins only a batch that has not been sent yet, so it sees every
write committed before it was asked (read-your-writes holds). Batches run in
their own tasks: a caller cancelled while its query is in flight gets its
``CancelledError`` at once, while the query finishes on its own, so no
connection is ever left half-way through a statement.

:class:`~casty_sa.calls.SharedAttempt` does the same for a one-off step many
callers wait for (a journal's start-up, opening a shared connection).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Hashable, Sequence

__all__ = ["BatchFetch", "ReadCoalescer"]

#: Queued keys per running batch before one more batch is started beside them.
_MIN_SHARE = 16

#: Fetches the values of a batch of distinct keys, in the order of the keys.
type BatchFetch[K, V] = Callable[[Sequence[K]], Awaitable[Sequence[V]]]


class ReadCoalescer[K: Hashable, V]:
    """Batches concurrent lookups of one kind into shared queries.

    Parameters
    ----------
    fetch : BatchFetch
        Looks up a batch of distinct keys and returns one value per key, in
        order. Its exception is raised to every caller of that batch (each
        caller decides on its own whether to retry).
    max_keys : int
        Most keys in one batch.
    concurrency : int
        Most batches in flight at once (the connections reads may use).
    track : Callable | None
        Called with every batch task, so its owner can wait for them on close.
    inline : bool
        Let an uncontended lookup run its query in the caller's own task
        instead of a batch task (saves a task and a turn of the event loop).
        Only for a ``fetch`` that a cancelled caller cannot cut off half-way,
        such as one queued on a driver's own thread.
    on_batch : Callable | None
        Called with the number of keys of each query sent (metrics).

    Examples
    --------
    >>> import asyncio
    >>> async def squares(keys):
    ...     calls.append(list(keys))
    ...     return [k * k for k in keys]
    >>> calls = []
    >>> async def main():
    ...     reads = ReadCoalescer(squares, max_keys=100, concurrency=1)
    ...     return await asyncio.gather(*(reads.get(k) for k in (2, 3, 3, 4)))
    >>> asyncio.run(main()), calls
    ([4, 9, 9, 16], [[2, 3, 4]])
    """

    def __init__(
        self,
        fetch: BatchFetch[K, V],
        *,
        max_keys: int,
        concurrency: int,
        track: Callable[[asyncio.Task[None]], None] | None = None,
        inline: bool = False,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_keys < 1 or concurrency < 1:
            raise ValueError("max_keys and concurrency must be >= 1")
        self._fetch = fetch
        self._max_keys = max_keys
        self._concurrency = concurrency
        self._track = track
        self._inline = inline
        self._on_batch = on_batch
        self._pending: dict[K, list[asyncio.Future[V]]] = {}
        self._workers = 0
        self._fetching = 0  # workers with a batch in flight
        self._quiet = asyncio.Event()  # set while no lookup is queued or in flight
        self._quiet.set()

    async def get(self, key: K) -> V:
        """The value of ``key``, fetched alone or together with concurrent lookups."""
        self._quiet.clear()
        if self._inline and not self._pending and self._workers < self._concurrency:
            return await self._alone(key)
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        waiting = self._pending.get(key)
        if waiting is None:
            self._pending[key] = [future]
        else:
            waiting.append(future)
        workers = self._workers
        # another batch goes out beside those in flight only for enough keys to be worth
        # a connection of its own; a few more wait for the next free worker instead
        if workers < self._concurrency and len(self._pending) > workers * _MIN_SHARE:
            self._start_worker()
        return await future

    async def _alone(self, key: K) -> V:
        """Fetch ``key`` in the caller's task; lookups arriving meanwhile queue up."""
        self._workers += 1
        self._fetching += 1
        if self._on_batch is not None:
            self._on_batch(1)
        try:
            values = await self._fetch([key])
        finally:
            self._workers -= 1
            self._fetching -= 1
            if self._pending and self._workers < self._concurrency:
                self._start_worker()
            self._settle_quiet()
        if len(values) != 1:
            raise AssertionError(f"a read of one key returned {len(values)} values")
        return values[0]

    def _start_worker(self) -> None:
        self._workers += 1
        task = asyncio.get_running_loop().create_task(self._work(), name="casty_sa-read-batch")
        if self._track is not None:
            self._track(task)

    def _next_batch(self) -> list[tuple[K, list[asyncio.Future[V]]]]:
        """Up to a fair share of the pending keys whose callers still wait.

        The share divides what is queued among the workers not yet fetching, so a
        storm spreads evenly over the connections instead of shrinking batch by batch.
        """
        pending = self._pending
        idle = max(1, self._workers - self._fetching)
        share = min(self._max_keys, math.ceil(len(pending) / idle))
        batch: list[tuple[K, list[asyncio.Future[V]]]] = []
        while pending and len(batch) < share:
            key = next(iter(pending))
            waiting = [f for f in pending.pop(key) if not f.done()]
            if waiting:  # every caller of this key was cancelled: not fetched
                batch.append((key, waiting))
        return batch

    async def _work(self) -> None:
        try:
            while self._pending:
                batch = self._next_batch()
                if not batch:
                    continue
                self._fetching += 1
                if self._on_batch is not None:
                    self._on_batch(len(batch))
                try:
                    values = await self._fetch([key for key, _ in batch])
                    if len(values) != len(batch):
                        raise AssertionError(
                            f"a batch read of {len(batch)} keys returned {len(values)} values"
                        )
                except BaseException as exc:
                    self._fetching -= 1
                    for _, waiting in batch:
                        _fail(waiting, exc)
                    if not isinstance(exc, Exception):
                        # this worker was cancelled (the loop shutting down): leave no
                        # caller waiting for a worker that will not come
                        for waiting in self._pending.values():
                            _fail(waiting, exc)
                        self._pending.clear()
                        raise
                    continue
                self._fetching -= 1
                for (_, waiting), value in zip(batch, values, strict=False):
                    for future in waiting:
                        if not future.done():
                            future.set_result(value)
        finally:
            self._workers -= 1
            self._settle_quiet()

    def _settle_quiet(self) -> None:
        if not self._workers and not self._pending:
            self._quiet.set()

    async def drain(self) -> None:
        """Wait until no lookup is queued or in flight (for ``close()``)."""
        await self._quiet.wait()


def _fail[V](waiting: list[asyncio.Future[V]], exc: BaseException) -> None:
    for future in waiting:
        if not future.done():
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
