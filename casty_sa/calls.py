"""What every journal call shares: work that outlives a cancelled caller, deadlines, and a
caller's own copy of an error many callers share.

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
from collections.abc import Coroutine
from typing import Any

from casty_sa.errors import JournalError

__all__ = ["Inflight", "copy_error", "deadline", "past"]


class Inflight:
    """Tasks running on their own (shielded work, coalesced reads) that ``close()`` awaits."""

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        """How many tracked tasks are still running."""
        return sum(not task.done() for task in self._tasks)

    def track(self, task: asyncio.Task[Any]) -> None:
        """Let :meth:`settle` wait for ``task``."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shielded[T](self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` to completion even if the caller is cancelled.

        The caller still sees its ``CancelledError`` at once, while the work
        finishes (or fails) on its own and :meth:`settle` waits for it.
        """
        task = asyncio.get_running_loop().create_task(work)
        self.track(task)
        return await asyncio.shield(task)

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
