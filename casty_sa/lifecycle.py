"""Starting once and closing once, however many callers ask and whenever they are cancelled.

Every journal call starts the journal first (connect, check or migrate the schema).
Callers that come while an attempt runs share its outcome, so a database that does not
answer meets one attempt, not a queue of them; the attempt runs in a task of its own, so
a cancelled caller never cuts a migration in two. Closing runs in a task of its own too,
and every ``close()`` waits for that one task.

Examples
--------
>>> import asyncio
>>> async def main() -> list[str]:
...     steps: list[str] = []
...     async def start() -> None:
...         steps.append("started")
...     async def close() -> None:
...         steps.append("closed")
...     life = Lifecycle(start, close, Inflight(), name="example")
...     await asyncio.gather(life.start(), life.start())
...     await life.close()
...     await life.close()
...     return steps
>>> asyncio.run(main())
['started', 'closed']
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Self

from casty_sa.calls import Inflight, SharedAttempt, copy_error
from casty_sa.errors import JournalClosed, JournalError

__all__ = ["AsyncContext", "Lifecycle"]


class Lifecycle:
    """Runs ``start`` once (until it succeeds) and ``close`` once (see the module docstring).

    Parameters
    ----------
    start, close : Callable[[], Coroutine]
        The owner's own steps.
    inflight : Inflight
        Where a start attempt runs, so the closing can wait for it.
    name : str
        Prefix of the two tasks' names.
    """

    __slots__ = ("_close", "_closing", "_name", "_ready", "_start", "_starting", "closed")

    def __init__(
        self,
        start: Callable[[], Coroutine[Any, Any, None]],
        close: Callable[[], Coroutine[Any, Any, None]],
        inflight: Inflight,
        *,
        name: str,
    ) -> None:
        self._start = start
        self._close = close
        self._name = name
        self._ready = False
        self._starting = SharedAttempt(self._start_once, f"{name}-start", track=inflight.track)
        self._closing: asyncio.Task[None] | None = None
        #: set by the first close(): every start from then on is refused
        self.closed = False

    async def start(self) -> None:
        """Start, or share the attempt under way, or return at once when started."""
        if self.closed:
            raise JournalClosed()
        if self._ready:
            return
        try:
            await self._starting()
        except JournalError as exc:
            raise copy_error(exc) from exc.__cause__  # each caller its own traceback
        if self.closed:  # close() ran while this call waited for the start
            raise JournalClosed("this SAJournal was closed while the call started")

    async def _start_once(self) -> None:
        await self._start()
        self._ready = True

    async def close(self) -> None:
        """Close once; safe to call again, also after a ``close()`` cancelled half-way."""
        if self._closing is None:
            self.closed = True
            self._closing = asyncio.get_running_loop().create_task(
                self._close(), name=f"{self._name}-close"
            )
        await asyncio.shield(self._closing)


class AsyncContext:
    """``async with obj:`` runs ``await obj.start()`` on entry and ``await obj.close()`` on exit."""

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
