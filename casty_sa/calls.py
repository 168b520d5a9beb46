"""What every journal call shares: work that outlives a cancelled caller, one attempt at a
step shared by the callers that wait for it, deadlines, and a caller's own copy of an error
many callers share.

A database call cut off half-way can leave a pooled connection in an unknown state, so
the journal runs such work in a task a cancelled caller cannot stop, and ``close()``
waits for those tasks (:class:`Inflight`).

Examples
--------
>>> import asyncio
>>> async def main() -> int:
...     inflight = Inflight()
...     value = await inflight.shielded(asyncio.sleep(0, 42))
...     await inflight.settle()
...     return value
>>> asyncio.run(main())
42
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from casty_sa.errors import JournalError

__all__ = ["Inflight", "SharedAttempt", "copy_error", "deadline", "past"]


class Inflight:
    """Tasks running on their own (shielded work, coalesced reads) that ``close()`` awaits."""

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()

    def track(self, task: asyncio.Future[Any]) -> None:
        """Let :meth:`settle` wait for ``task``."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shielded[T](self, work: Awaitable[T]) -> T:
        """Run ``work`` to completion even if the caller is cancelled.

        The caller still sees its ``CancelledError`` at once, while the work
        finishes (or fails) on its own and :meth:`settle` waits for it.
        """
        task = asyncio.ensure_future(work)
        self.track(task)
        return await asyncio.shield(task)

    def start[T](self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """``work`` in a task started at once (in the caller's turn, so work that never
        waits costs no trip through the event loop), tracked unless it is already done."""
        task = asyncio.Task(work, loop=asyncio.get_running_loop(), eager_start=True)
        if not task.done():
            self.track(task)
        return task

    async def settle(self) -> None:
        """Wait for every tracked task, including any one of them started meanwhile."""
        # a finished task leaves the set only when its callback runs: look at done() instead
        while running := [task for task in self._tasks if not task.done()]:
            await asyncio.gather(*running, return_exceptions=True)


def deadline(budget: float | None) -> float | None:
    """The ``time.monotonic()`` value a call with ``budget`` seconds must end by."""
    return None if budget is None else time.monotonic() + budget


def past(deadline: float | None, ahead: float = 0.0) -> bool:
    """Whether ``deadline`` (a ``time.monotonic()`` value) is passed ``ahead`` seconds from now."""
    return deadline is not None and time.monotonic() + ahead >= deadline


def copy_error[E: JournalError](exc: E) -> E:
    """A fresh instance per caller, so tracebacks of different callers do not pile up."""
    clone = type(exc).__new__(type(exc))
    clone.__dict__.update(exc.__dict__)
    clone.args = exc.args
    clone.__cause__ = exc.__cause__
    return clone


class SharedAttempt[T]:
    """One attempt at a time at a step; callers that come while it runs share its outcome.

    A caller that comes once the attempt has ended starts the next one (the
    caller decides beforehand whether the step is still needed). The attempt
    runs in a task of its own, so a caller cancelled half-way never cuts it in
    two, and its exception is retrieved even when every caller was cancelled.

    Parameters
    ----------
    step : Callable[[], Coroutine]
        Makes one attempt.
    name : str
        Name of the attempt's task.
    track : Callable | None
        Called with every attempt's task, so its owner can wait for it on close.

    Examples
    --------
    >>> import asyncio
    >>> async def slow() -> int:
    ...     tries.append(1)
    ...     await asyncio.sleep(0.01)
    ...     return 42
    >>> tries = []
    >>> async def main():
    ...     attempt = SharedAttempt(slow, "example")
    ...     return await asyncio.gather(*(attempt() for _ in range(5)))
    >>> asyncio.run(main()), len(tries)
    ([42, 42, 42, 42, 42], 1)
    """

    def __init__(
        self,
        step: Callable[[], Coroutine[Any, Any, T]],
        name: str,
        *,
        track: Callable[[asyncio.Task[Any]], None] | None = None,
    ) -> None:
        self._step = step
        self._name = name
        self._track = track
        self._task: asyncio.Task[T] | None = None

    async def __call__(self) -> T:
        """The outcome of the attempt in flight, or of a new one if none is."""
        attempt = self._task
        if attempt is None or attempt.done():
            attempt = asyncio.get_running_loop().create_task(self._step(), name=self._name)
            attempt.add_done_callback(_retrieve)
            self._task = attempt
            if self._track is not None:
                self._track(attempt)
        return await asyncio.shield(attempt)

    async def settled(self) -> None:
        """Wait until no attempt is in flight (whatever its outcome)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a task's exception as seen (its callers may all have been cancelled)."""
    if not task.cancelled():
        task.exception()
